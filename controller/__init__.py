"""trainwarden.controller"""
