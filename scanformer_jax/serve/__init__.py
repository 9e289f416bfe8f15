"""`scanformer serve`: a web page and a JSON endpoint in front of a `Predictor`.

`app.make_server(predictor, host, port)` builds the server; `batcher.Batcher` groups
concurrent requests into one forward. Standard library only (see `app`).
"""
