"""What every HTTP route shares: who may call (security.py), the hot routes' route class
(routing.py), the /api body guard, common answer models and paging, the probes and the docs."""
