"""Ship what training made: a servable MLflow model, batch candidates and a fresh item index.

    bundle.py    what a served model holds, as plain files, and how requests are encoded
    model.py     CandidateModel: a bundle's query tower + item index; requests -> ranked candidates
    pyfunc.py    the MLflow pyfunc wrapper (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
    model_code.py  the file MLflow runs to load the model ("models from code": nothing pickled)
    export.py    bundle + log a run's model (``convcg train``, ``convcg export``), register it
    server.py    ``convcg serve``: MLflow's ``/invocations`` JSON protocol over HTTP, with less overhead
    batch.py     ``convcg retrieve``: candidates for a request file, streamed in chunks
    reindex.py   ``convcg index``: a new item table embedded by the trained item tower

Every ranking goes through :mod:`convcg_cli.index` (its ``Retriever``), the path ``convcg eval`` scores.
"""
