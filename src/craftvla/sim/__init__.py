"""Simulation: Meta-World envs and experts (`metaworld`), the closed-loop runner (`rollout`),
policy adapters (`policies`), and the `collect` / `eval` verbs (`collect`, `evaluate`)."""
