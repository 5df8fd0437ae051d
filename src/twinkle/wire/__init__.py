"""What travels between a Twinkle client and a Twinkle server: the table of remote classes and methods
(``methods``) and the JSON value codec (``codec``).

Both sides import this package and nothing of each other: the client never imports the server, the
server never imports the client. It must stay importable without torch or transformers (thin clients
ship it).
"""
