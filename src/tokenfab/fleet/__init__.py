"""The fleet: many backends behind one gateway, routed by cache affinity and load, with health and failover."""
