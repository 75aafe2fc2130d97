"""Beyond one machine: a team tracking server on PostgreSQL
(:mod:`cluster.team_server`), experiment sweeps on a Ray cluster
(:mod:`cluster.sweep`) and the launch of one training over several hosts
(:mod:`cluster.launch`). Nothing in :mod:`stages` imports this package: the
pipeline runs the same on one machine without it."""
