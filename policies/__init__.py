"""trainwarden.policies"""
