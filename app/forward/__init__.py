"""Forwarding: every status change and reply pushed to the user's own webhook endpoints.

The write path stores the events and their deliveries in the callback's own transaction
(app/store/outbox.py); from there on everything is here:

- endpoints.py   endpoints: create, list, change, rotate secrets, replay (SQL, no HTTP)
- deliveries.py  the deliveries listing and manual retry (SQL, no HTTP)
- queue.py       the dispatcher's SQL: claim with a lease, record outcomes
- dispatcher.py  the Forwarder: claims due deliveries and sends them, per-endpoint lanes
- client.py      the HTTP/1.1 client it sends with (h11, keep-alive, checked addresses)
- routes.py / schemas.py   the REST routes and their models

Secrets and signatures are in app/core/webhook_signing.py, the URL rules in app/core/targets.py,
the `dlr endpoints|deliveries` commands in app/cli/forwarding.py.
"""
