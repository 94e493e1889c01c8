"""The Dagster layer: face_assets as software-defined assets, sensors and schedules.

It holds no face logic: every asset calls the library (``ingest_paths``, ``Catalog``,
``FaceRecognitionLibrary``) exactly as a user would. One module per concern:

- :mod:`.batches`: which files are new, grouped into batches that become dynamic partitions;
- :mod:`.resources`: the configured library (settings, models, catalog, folders) as a resource;
- :mod:`.assets`: source images -> filtered images -> face embeddings -> ANN index, with checks;
- :mod:`.clusters`: person clusters (incremental assignment, full re-clustering when due), with a check;
- :mod:`.learning`: feedback pairs -> fine-tuned model (gate check) -> promoted model, and re-embedding;
- :mod:`.charts`: markdown charts for the UI metadata;
- :mod:`.sensors`: the new-image, index, cluster, retraining and re-embedding sensors, the nightly schedule;
- :mod:`.definitions`: ``defs`` for ``dagster dev`` / ``dagster asset materialize``, and the jobs;
- :mod:`.executors`: the Dask executor (optional ``distributed`` extra);
- :mod:`.runner`: ``face-assets pipeline``, the main job of ``make run``;
- :mod:`.processes`: the daemon and webserver of a deployment, with plain, quiet logs.

See ``docs/pipeline.md`` and ``docs/scaling.md``.
"""
