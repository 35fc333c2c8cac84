"""Reactors (DESIGN §6): workers that read facts and publish new ones as guarded
commands (lease sweeper, stale-runtime marker), safe to run many times."""
