"""trainwarden.examples"""
