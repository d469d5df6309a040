"""Durable usage and billing: API keys, tenants and budgets, reservations, usage records (SQLite or PostgreSQL)."""
