"""`probe browse`: a read-only local web app over a store and its results.

`context` opens the store and results once (`BrowseContext`); each page module (`overview`,
`image`, `errors`, `maps`, `search`) exposes `routes(ctx)`; `thumbs` renders and caches images;
`app` assembles them with the token check and security headers. Nothing here imports torch:
only a text query (in `search`) loads a model, lazily.
"""
