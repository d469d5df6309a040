"""Token-factory economics: tiers and prices, cost per token, revenue, and the factory planner (pure)."""
