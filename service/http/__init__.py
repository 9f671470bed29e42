"""The HTTP edge: app factory (:mod:`service.http.app`), routes (detect, batch, stream, models, health, web), the
state, admission, body reading and option parsing every route shares (:mod:`service.http.serving`), and the
transport limits (:mod:`service.http.transport`). It depends on the stages; no stage imports it."""
