"""Poisoning attacks: each module turns a catalog + AttackSpec into a PoisonPlan (pure, seeded)."""
