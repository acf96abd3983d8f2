"""trainwarden.adapters"""
