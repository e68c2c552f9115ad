"""RAG in the loop: files, vector stores of their embedded chunks, and search over them.

store.py keeps OpenAI's objects (files, vector stores, their files, file batches) and the chunks'
vectors in Qdrant: embedded in the server's process (qdrant-client's local mode, in memory or in a
folder) or a Qdrant server that several replicas share. chunking.py cuts a file's text into
overlapping token windows as OpenAI's vector stores do; filters.py turns OpenAI's attribute filters
into Qdrant's. The server (server/retrieval.py) embeds with a served embedding model and runs the
searches, for /v1/vector_stores and the Responses API's file_search tool. Nothing here knows HTTP.
"""
