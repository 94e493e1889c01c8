"""The one place that reads configuration.

Settings come, from lowest to highest priority, from the built-in defaults below, a YAML or TOML
file, and environment variables named ``FACE_ASSETS__<SECTION>__<KEY>`` (values parsed as YAML, so
``FACE_ASSETS__FILTER__MIN_DET_SCORE=0.6`` or ``FACE_ASSETS__MODELS__DEVICE=cuda``). Everything is
validated once; a wrong key or value raises :class:`~face_assets.errors.ConfigError` naming the key
and what is allowed. The resulting :class:`Settings` object is passed down, never re-read.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

ENV_PREFIX = "FACE_ASSETS__"
CONFIG_ENV = "FACE_ASSETS_CONFIG"
DATASETS_ENV = "FACE_ASSETS_DATASETS"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSettings(_Section):
    """Which model pack to run and where."""

    pack: str = Field(
        "buffalo_s",
        description="Pack name (looked up under `pack_dirs`) or a directory of InsightFace ONNX files.",
    )
    pack_dirs: list[Path] = Field(
        default_factory=lambda: [Path("data/models"), Path("~/.insightface/models")],
        description="Folders searched for a pack named `pack` (the built-in buffalo_s needs none).",
    )
    detector_file: str | None = Field(None, description="Detector file name inside the pack, if ambiguous.")
    recognizer_file: str | None = Field(None, description="Recognizer file name inside the pack, if ambiguous.")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="onnxruntime providers: cpu, cuda, or auto (CUDA when available)."
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = all cores.")
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads.")
    allow_spinning: bool = Field(
        False, description="Let onnxruntime threads busy-wait; off doubles throughput on few cores."
    )
    rec_batch_size: int = Field(32, ge=1, le=1024, description="Aligned faces per recognizer call.")


class DetectionSettings(_Section):
    """How faces are found."""

    det_size: int = Field(640, ge=64, le=2048, description="Square detector input size (multiple of 32).")
    det_thresh: float = Field(0.5, gt=0.0, lt=1.0, description="Detector candidate threshold.")
    nms_thresh: float = Field(0.4, gt=0.0, lt=1.0, description="Detector non-maximum suppression IoU.")
    pad_ratio: float = Field(
        0.5,
        ge=0.0,
        le=2.0,
        description="When nothing is found, pad each side by this fraction of the image and retry "
        "(tight crops); 0 disables the retry.",
    )
    native_scale: bool = Field(
        True,
        description="Detect images smaller than `det_size` at their own size (rounded up to a multiple of 32, "
        "at least `native_min_size`) instead of enlarged to `det_size`: 4 to 6x less detection on small "
        "photos, the same faces found.",
    )
    native_min_size: int = Field(
        320,
        ge=32,
        le=2048,
        description="Smallest detector input at native scale: smaller images are still enlarged to it (SCRFD "
        "misses many faces of 60 px tiles at their own size; from 320 on it finds those it finds at 640).",
    )
    max_faces: int = Field(0, ge=0, description="Keep at most this many faces per image (0 = all).")
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Images of a batch detected at once, by threads with a detector session each on their "
        "share of `models.intra_op_threads`: onnxruntime's threads idle between the small layers of SCRFD, "
        "and a second image fills the gap (1.3x on 2 cores). Single images use all the threads.",
    )

    @model_validator(mode="after")
    def _multiple_of_32(self) -> "DetectionSettings":
        if self.det_size % 32:
            raise ValueError(f"det_size must be a multiple of 32, got {self.det_size}")
        if self.native_min_size % 32:
            raise ValueError(f"native_min_size must be a multiple of 32, got {self.native_min_size}")
        return self


class FilterSettings(_Section):
    """Thresholds of `filter_image`; defaults calibrated by `face-assets calibrate` on the shared data."""

    min_det_score: float = Field(
        0.569, ge=0.0, le=1.0, description="Minimum detector confidence of a face found directly."
    )
    min_det_score_padded: float = Field(
        0.563,
        ge=0.0,
        le=1.0,
        description="Minimum detector confidence of a face found by the padded retry (its scores follow "
        "another scale).",
    )
    good_face_norm: float = Field(
        18.35,
        ge=0.0,
        description="A face with at least this embedding norm and `good_face_size` px is kept whatever its "
        "detector confidence (a clean, large face is never rejected on det_score alone).",
    )
    good_face_size: int = Field(
        64, ge=0, description="Minimum of face box width and height, pixels, for the `good_face_norm` rule."
    )
    min_embedding_norm: float = Field(
        14.05, ge=0.0, description="Minimum raw ArcFace embedding norm (low = ambiguous face)."
    )
    min_face_size: int = Field(36, ge=0, description="Minimum of face box width and height, pixels.")
    min_face_area_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Minimum face box area / image area (0 = off: group photos are legitimate)."
    )
    cartoon_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Cartoon probability above which a face is rejected; None = the classifier's "
        "calibrated threshold.",
    )
    check_cartoon: bool = Field(True, description="Run the cartoon/illustration classifier.")


class SearchSettings(_Section):
    """Search and 1:1 comparison."""

    match_threshold: float = Field(
        0.25,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity at or above which two faces are the same person (`compare`); "
        "calibrated at FAR 1e-3 on the shared labelled faces.",
    )


class ImageSettings(_Section):
    """Image decoding limits."""

    max_pixels: int = Field(
        64_000_000, ge=1, description="Images with more pixels are refused (decompression bombs)."
    )


class StorageSettings(_Section):
    """Where results live."""

    data_dir: Path = Field(Path("data"), description="Home of the DuckDB file, index and models.")
    duckdb_file: str = Field("face_assets.duckdb", description="Catalog file name inside `data_dir`.")
    index_file: str = Field("faces.faiss", description="faiss index file name inside `data_dir`.")
    index_factory: str = Field(
        "auto",
        description="faiss index factory string, or `auto`: exact search for small collections, "
        "IVF for large ones.",
    )
    index_save_every: int = Field(
        1000, ge=1, description="Save the index after this many new images during bulk indexing."
    )
    store_dir: str = Field(
        "store",
        description="Folder inside `data_dir` of the master store files, which only face_assets opens, in short "
        "sessions; readers use the published views (`duckdb_file`, `feedback.duckdb`).",
    )
    lock_timeout_seconds: float = Field(
        120.0, gt=0, description="How long a process waits for another one's session on a store file before "
        "`StoreBusyError`."
    )
    publish_interval_seconds: float = Field(
        1.0, ge=0, description="At most one publication of a store's committed state per this many seconds and "
        "process; later changes are published when it has passed."
    )
    segment_retention_seconds: float = Field(
        3600.0, ge=0, description="A published store is a views file over Parquet segments: a segment no view "
        "names any more is deleted this long after, so readers that keep the views they opened go on reading."
    )
    max_delta_segments: int = Field(
        16, ge=2, description="Delta segments a published table collects before they are folded together (in the "
        "background, from the Parquet files, never under the catalog's lock)."
    )
    index_journal_min_bytes: int = Field(
        64 * 2**20, ge=0, description="Changes to the saved index are appended to its journal (`<index_file>.journal`) "
        "until it holds this many bytes and `index_journal_share` of the index; then the index is saved whole."
    )
    index_journal_share: float = Field(
        0.25, ge=0, description="See `index_journal_min_bytes`: the journal's size, as a share of the index file's, "
        "beyond which the index is saved whole (readers then load it whole once)."
    )
    index_refresh_seconds: float = Field(
        1.0, ge=0, description="How often a running library (the search service) looks for a newer index file "
        "published by another process."
    )

    @property
    def duckdb_path(self) -> Path:
        """The published catalog: the file analysts, BI tools and read-only commands open (read-only)."""
        return self.data_dir / self.duckdb_file

    @property
    def master_path(self) -> Path:
        """The catalog's master file, opened only by face_assets in short sessions."""
        return self.data_dir / self.store_dir / "catalog.duckdb"

    @property
    def feedback_master_path(self) -> Path:
        """The DuckDB feedback store's master file (votes and queries)."""
        return self.data_dir / self.store_dir / "feedback.duckdb"

    @property
    def feedback_path(self) -> Path:
        """The published feedback store, for analysts and read-only commands."""
        return self.data_dir / "feedback.duckdb"


class FeedbackSettings(_Section):
    """The feedback store, the search web app and the export of votes to training data."""

    backend: Literal["duckdb", "postgresql"] = Field(
        "duckdb", description="Where votes are stored: the data folder's own DuckDB feedback store (not the catalog), or a "
        "PostgreSQL server (`postgresql_dsn`)."
    )
    postgresql_dsn: str = Field(
        "",
        description="libpq connection string of the PostgreSQL feedback store, e.g. "
        "`host=db.example port=5432 dbname=face_assets user=feedback`; give the password through "
        "`PGPASSWORD` or `~/.pgpass`, not here.",
    )
    query_dir: str = Field(
        "feedback/queries", description="Folder inside `storage.data_dir` where uploaded query images are kept."
    )
    search_top_k: int = Field(12, ge=1, le=200, description="Results shown per search on the web page.")
    max_upload_bytes: int = Field(20_000_000, ge=1, description="Largest query image accepted by `POST /api/search`.")
    thumbnail_size: int = Field(160, ge=16, le=1024, description="Longest side of face thumbnails, pixels.")
    self_pair_similarity: float = Field(
        0.995, ge=0.0, le=1.0,
        description="Export: a vote whose query and result are at least this similar is a self-pair "
        "(the same photo) and is dropped.",
    )
    min_vote_agreement: float = Field(
        0.67, gt=0.5, le=1.0,
        description="Export: share of voters that must agree on a pair; below it the pair is dropped as conflicting.",
    )
    mining_candidates: int = Field(50, ge=1, description="Export: neighbours searched per query for mined negatives.")
    mined_negatives_per_query: int = Field(5, ge=0, description="Export: hardest mined negatives kept per query.")
    max_negatives_per_positive: float = Field(
        4.0, gt=0.0,
        description="Export: class balance cap; mined negatives beyond this ratio are dropped, easiest first.",
    )
    triplet_negatives_per_positive: int = Field(
        3, ge=1, description="Export: triplets made per positive pair, hardest negatives first."
    )


class WebSettings(_Section):
    """The review web app (`face-assets serve`): authentication, limits, files (docs/web.md)."""

    auth: Literal["tokens", "none"] = Field(
        "tokens",
        description="`tokens`: every request needs an API token (`face-assets token create`) or a page login; "
        "`none`: no authentication, refused unless the server binds a loopback address.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost"],
        description="Host header values served (others get 400: DNS rebinding); add the public name when "
        "running behind a reverse proxy.",
    )
    cookie_secure: bool = Field(
        False, description="Mark the session and CSRF cookies `Secure` (set it when served over HTTPS)."
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="Lifetime of a page login.")
    max_json_bytes: int = Field(
        65_536, ge=1024, description="Largest body of a request other than an image upload (413 beyond, unread)."
    )
    max_query_pixels: int = Field(
        4_000_000, ge=10_000, description="Query images with more pixels are downscaled to this before detection."
    )
    max_decode_pixels: int = Field(
        50_000_000, ge=10_000,
        description="Query images with more pixels (read from the file header) are refused with 413, undecoded.",
    )
    max_concurrent_searches: int = Field(
        2, ge=1, description="Searches run at once; more get 503 with `Retry-After` (bounds memory and CPU)."
    )
    search_nice: int = Field(
        10, ge=0, le=19,
        description="CPU priority (nice) of the threads that decode, detect and embed query images: the service's "
        "short requests (people pages, curation, votes) go before a search's half second of inference, and "
        "searches before the pipeline's heavy work (`process.background_nice`) where both share a process group. "
        "0: no change.",
    )
    rate_limit: str = Field(
        "600/minute", description="Requests per token (or per client address without auth), `limits` syntax."
    )
    search_rate_limit: str = Field("60/minute", description="Searches per token, on top of `rate_limit`.")
    auth_failure_limit: str = Field(
        "60/minute", description="Failed authentications (a wrong token, an ended session) per client address, and "
        "per token id named; beyond: 429 for that address or token id, valid credentials included."
    )
    tokens_file: str = Field(
        "auth/tokens.json", description="Hashed API tokens inside `storage.data_dir` (written by `face-assets token`)."
    )
    thumbnail_dir: str = Field("thumbnails", description="Cache of face thumbnails inside `storage.data_dir`.")
    prewarm_thumbnails: bool = Field(
        True, description="At start, make the missing thumbnails in the background (covers first, lowest CPU priority)."
    )


class PipelineSettings(_Section):
    """The Dagster asset graph: which folders it watches and how new images are batched."""

    watched_folders: list[Path] = Field(
        default_factory=list,
        description="Folders the new-image sensor and `face-assets pipeline` scan; empty = `incoming/` inside "
        "`storage.data_dir` (created when missing).",
    )
    settle_seconds: float = Field(
        2.0,
        ge=0,
        description="A file is read only once neither its content nor its metadata changed for this long, "
        "so a file still being copied is left for a later scan (raise it for slow network copies).",
    )
    max_partition_retries: int = Field(
        3,
        ge=0,
        description="How many times a failed run of a batch is launched again (from the failed step) before "
        "the batch is left failed; Dagster's run retries, done by the daemon and by `face-assets pipeline`.",
    )
    step_retries: int = Field(
        4,
        ge=0,
        description="How many times a step that touches the shared catalog or index files is retried within "
        "its run after an error (a held lock, a busy file), with exponential backoff and jitter.",
    )
    recursive: bool = Field(True, description="Scan the watched folders recursively.")
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"],
        description="File name endings (case-insensitive) the sensor treats as images; other files are ignored.",
    )
    batch_size: int = Field(
        500, ge=1, le=100_000, description="New images per partition of the graph (one run per partition)."
    )
    sensor_interval_seconds: int = Field(
        5, ge=5, description="How often the new-image sensor scans the folders (a tick with nothing new only lists "
        "them: one `stat` per file)."
    )
    index_refresh_seconds: int = Field(
        5,
        ge=5,
        description="How often the automation sensor of `ann_index` and `person_clusters` evaluates their "
        "conditions (reading the event log only); the batches merged in between are indexed, then clustered, "
        "in one run.",
    )
    nightly_cron: str | None = Field(
        None,
        description="Cron expression of the optional nightly schedule that refreshes what depends on the "
        "whole catalog (e.g. `0 2 * * *`); None = no schedule.",
    )
    executor: Literal["multiprocess", "in_process", "dask"] = Field(
        "in_process",
        description="Where the steps of the ingest job run (also when launched by `face-assets pipeline`): all in "
        "the run's process (its steps are a chain: batches run in parallel as concurrent runs), a process each, "
        "or tasks on a Dask cluster (docs/scaling.md).",
    )
    dask_scheduler: str | None = Field(
        None,
        description="Address of the Dask scheduler for `executor: dask` (e.g. `tcp://scheduler:8786`); "
        "None = a local Dask cluster per run.",
    )
    feedback_export_dir: str = Field(
        "feedback/export",
        description="Folder inside `storage.data_dir` where the `feedback_pairs` asset writes `pairs.parquet`, "
        "`triplets.parquet` and `report.json`.",
    )
    retrain_min_new_votes: int = Field(
        100,
        ge=1,
        description="The retraining sensor requests a fine-tuning run once this many votes were cast or "
        "changed since the last run it requested.",
    )
    retrain_check_seconds: int = Field(300, ge=5, description="How often the retraining sensor counts new votes.")
    auto_promote: bool = Field(
        False,
        description="The retraining job also promotes a candidate that passed the evaluation gate (hot-swap "
        "and re-embedding); False leaves promotion to a person (`promoted_model` in the UI, or the CLI).",
    )
    reembed_check_seconds: int = Field(
        60,
        ge=5,
        description="How often the re-embedding sensor looks for a newly promoted model version.",
    )
    min_cluster_cohesion: float = Field(
        0.3,
        ge=-1.0,
        le=1.0,
        description="Floor of the `person_clusters` quality check: the size-weighted mean cosine between the faces "
        "of each multi-face cluster.",
    )


class TrainingSettings(_Section):
    """Fine-tuning the recognizer from feedback, the evaluation gate and the model registry."""

    active_model: str | None = Field(
        None,
        description="Registry version the library runs; None follows the registry (the promoted version, "
        "else the pack's own recognizer); `base` pins the pack's recognizer.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="torch device for training: cpu, cuda, or auto (cuda when torch sees one, else cpu)."
    )
    threads: int = Field(0, ge=0, description="torch CPU threads while training; 0 = torch's default.")
    epochs: int = Field(6, ge=1, description="Passes over the training pairs.")
    steps_per_epoch: int = Field(0, ge=0, description="Batches per epoch; 0 = enough to see every pair once.")
    batch_size: int = Field(32, ge=2, description="Pairs per batch, half same-person and half different-person.")
    triplets_per_batch: int = Field(8, ge=0, description="Triplets added to each batch when any exist.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0.0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Learning-rate schedule over epochs.")
    lr_step_epochs: int = Field(2, ge=1, description="`step` schedule: epochs between decays.")
    lr_gamma: float = Field(0.5, gt=0.0, le=1.0, description="`step` schedule: decay factor.")
    freeze: Literal["none", "head", "last_blocks"] = Field(
        "last_blocks",
        description="What trains: every layer, only the embedding head (linear + batch norm), or the head "
        "and the last `trainable_blocks` convolution blocks.",
    )
    trainable_blocks: int = Field(6, ge=0, description="`last_blocks`: convolutions (with their PReLU) that train.")
    unfreeze_epoch: int | None = Field(
        None, ge=1, description="From this epoch (1-based) on every layer trains; None keeps the freeze."
    )
    pair_margin: float = Field(0.1, ge=0.0, le=1.0, description="Cosine margin of the pair loss around the threshold.")
    pair_scale: float = Field(16.0, gt=0.0, description="Scale of the pair loss logits.")
    triplet_margin: float = Field(0.2, ge=0.0, le=2.0, description="Cosine margin of the triplet loss.")
    triplet_weight: float = Field(1.0, ge=0.0, description="Weight of the triplet loss.")
    keep_close_weight: float = Field(
        2.0, ge=0.0,
        description="Weight of |e - e0|^2 / |e0|^2 between new and original raw embeddings (the anti-drift term).",
    )
    hard_negative_temperature: float = Field(
        0.1, gt=0.0, description="Negatives are drawn with weight exp(similarity / T): lower favours hard ones."
    )
    unvoted_negatives: bool = Field(
        True,
        description="Also train on pairs no vote joins (faces of different voted persons) that the current model "
        "keeps below the threshold, as different-person pairs.",
    )
    augment: bool = Field(True, description="Random flip, colour, blur and scale of the training crops.")
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of persons held out for validation.")
    seed: int = Field(0, description="Seed of sampling, augmentation and the person split.")
    verify_tolerance: float = Field(1e-4, gt=0.0, description="Max abs difference allowed by conversion/export checks.")
    gate_max_drop: float = Field(
        0.005, ge=0.0, description="Largest drop of any general-set metric a promotion tolerates (0.005 = 0.5 point)."
    )
    general_eval_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders of `<identity>/<image>` for the general gate set; empty = every real face of the "
        "shared datasets' manifest that names its person.",
    )
    calibration_far: float = Field(
        1e-3, gt=0.0, lt=1.0,
        description="False accept rate on the general set at which a new version's match threshold is calibrated.",
    )
    calibration_not_above_parent: bool = Field(
        True,
        description="Calibrate at the running version's false accept rate on the same set when that is lower, "
        "so a new version never accepts more strangers there than the one it replaces.",
    )
    gate_bootstrap_rounds: int = Field(
        1000, ge=100, description="Bootstrap draws of the operating-point intervals of the gate."
    )
    gate_confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Two-sided level of the gate's operating-point intervals."
    )


class ClusteringSettings(_Section):
    """Person clustering (`face_assets.clustering`); thresholds tuned on the synthetic benchmark, see docs/clustering.md."""

    k: int = Field(16, ge=1, le=256, description="Neighbours per face in the kNN graph.")
    pca_dim: int = Field(
        256, ge=8, description="Dimension of the subspace the kNN graph is searched in (>= embedding size: full)."
    )
    list_size: int = Field(512, ge=16, description="Target faces per inverted list of the kNN graph join.")
    nprobe: int = Field(24, ge=1, description="Inverted lists each face is compared with.")
    tau_1: float = Field(
        0.53, ge=-1.0, le=1.0, description="Cosine two single faces need to be put together (average-linkage law)."
    )
    tau_inf: float = Field(
        0.3, ge=-1.0, le=1.0, description="Average cosine large clusters need to merge (the law's limit)."
    )
    tau_face: float = Field(
        0.27, ge=-1.0, le=1.0,
        description="The limit for one face joining a cluster (full runs and incremental assignment).",
    )
    tau_decay: float = Field(
        1.0, gt=0.0, description="Threshold between clusters of sizes a, b: tau_inf + (tau_1 - tau_inf) / (a*b)**tau_decay."
    )
    min_ratio: float = Field(
        0.6, ge=0.0, le=1.0,
        description="Clusters of 2+ faces also need an average cosine of this fraction of sqrt(cohesion_A * "
        "cohesion_B): keeps well-photographed look-alike people apart.",
    )
    mean_k: int = Field(
        8, ge=0,
        description="Once the graph's candidates are exhausted, faces still alone get this many more: the clusters "
        "whose means give them the best average cosine, as in incremental assignment (0: graph candidates only).",
    )
    join_ratio: float = Field(
        1.25, ge=0.0,
        description="A face still alone at the end joins the cluster of 2+ faces it is clearly closest to: its cosine "
        "with that cluster's mean direction at least this many times that with the second-best one (0: off). Full "
        "runs and incremental assignment alike.",
    )
    join_floor: float = Field(
        0.35, ge=-1.0, le=1.0,
        description="The cosine with the mean direction such a join needs at least, whatever the ratio.",
    )
    split_k: int = Field(2, ge=2, description="Default number of sub-clusters of an automatic split.")
    quality_sample: int = Field(10_000, ge=1, description="Faces sampled for the silhouette of a run.")
    recluster_growth: float = Field(
        0.2, gt=0.0, description="Re-cluster fully once the library grew by this fraction since the last full run."
    )
    recluster_unassigned: float = Field(
        0.05, gt=0.0, le=1.0,
        description="Re-cluster fully once this fraction of faces was left alone by incremental assignment.",
    )
    recluster_max_age_days: float = Field(30.0, gt=0.0, description="Re-cluster fully at this age if anything changed.")

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `clustering.cluster_embeddings` from these settings."""
        return {"k": self.k, "pca_dim": self.pca_dim, "list_size": self.list_size, "nprobe": self.nprobe,
                **self.linkage_kwargs()}

    def linkage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `clustering.average_linkage` from these settings."""
        return {**self.link_kwargs(), "min_ratio": self.min_ratio, "mean_k": self.mean_k}

    def link_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the rule a face joins a cluster by (`clustering.assign_to_clusters`)."""
        return {"tau_1": self.tau_1, "tau_inf": self.tau_inf, "decay": self.tau_decay, "tau_face": self.tau_face,
                "join_ratio": self.join_ratio, "join_floor": self.join_floor}


class ProcessSettings(_Section):
    """Process-wide settings, applied once at start-up by each entry point (`face_assets.process`)."""

    omp_threads: int = Field(
        0, ge=0, description="OpenMP threads of faiss (index training and search, the clustering graph); 0 = all cores."
    )
    omp_wait_policy: Literal["passive", "active"] = Field(
        "passive",
        description="What idle OpenMP threads of faiss do: sleep (`passive`) or busy-wait (`active`). Busy-waiting "
        "turns small parallel steps into a crawl on a few shared cores (k-means on 6,000 vectors: 22 s vs 0.2 s). "
        "An `OMP_WAIT_POLICY` environment variable wins.",
    )
    pipeline_share_nice: int = Field(
        5, ge=0, le=19,
        description="CPU share of the Dagster daemon's session (its run workers included) against the service's, "
        "as a nice value: Linux shares the CPU between sessions (or systemd units, by `CPUWeight=`) before threads' "
        "nice values count. At 5 the pipeline gets a quarter of a CPU the service saturates, so searches during "
        "ingestion stay near their idle latency; the daemon's unit sets `CPUWeight=30` to the same effect. 0: an equal "
        "share.",
    )
    background_nice: int = Field(
        15, ge=0, le=19,
        description="CPU priority (nice) of the pipeline's heavy work: embedding a batch, a full re-clustering, "
        "fine-tuning, re-embedding the catalog. It runs on a thread of its own at this priority, so searches go "
        "first; the rest of a run (its start, the merge, the index) runs at the process's priority, so a new "
        "batch becomes searchable without waiting for the CPU. 0: no change.",
    )


class Settings(_Section):
    """All settings of face_assets, one section per concern."""

    models: ModelSettings = Field(default_factory=ModelSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    filter: FilterSettings = Field(default_factory=FilterSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    clustering: ClusteringSettings = Field(default_factory=ClusteringSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    process: ProcessSettings = Field(default_factory=ProcessSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict of every setting."""
        return self.model_dump(mode="json")

    @property
    def layout(self) -> DataLayout:
        """Where everything lives inside the data folder (``storage.data_dir``)."""
        return DataLayout(self)


class DataLayout:
    """Every file and folder face_assets keeps inside the data folder, named once.

    Paths are under :attr:`root` (``storage.data_dir`` as configured, relative or absolute); the
    settings that name a file (``storage.duckdb_file``, ``web.tokens_file``...) are read here and
    nowhere else. The owner of each is in docs/architecture.md.
    """

    def __init__(self, settings: Settings):
        self._settings = settings
        self.root = Path(settings.storage.data_dir)

    # -- stores: master files (short sessions) and what they publish for readers
    @property
    def catalog(self) -> Path:
        """The published catalog (views over Parquet segments) that readers open."""
        return self._settings.storage.duckdb_path

    @property
    def catalog_master(self) -> Path:
        """The catalog's master file: images, faces, persons, model registry, audit log."""
        return self._settings.storage.master_path

    @property
    def feedback(self) -> Path:
        """The published feedback store (votes and queries) that readers open."""
        return self._settings.storage.feedback_path

    @property
    def feedback_master(self) -> Path:
        """The DuckDB feedback store's master file."""
        return self._settings.storage.feedback_master_path

    @property
    def index(self) -> Path:
        """The faiss index (its journal and sidecar lie beside it)."""
        return self.root / self._settings.storage.index_file

    @property
    def cluster_means(self) -> Path:
        """The person clusters' means kept for incremental assignment (``cluster_means.ClusterMeans``),
        beside the catalog master whose clusters they reflect."""
        return self.catalog_master.parent / "cluster_means"

    # -- models
    @property
    def model_versions(self) -> Path:
        """Fine-tuned recognizer versions, ``<version>.onnx`` (the registry stores paths relative to :attr:`root`)."""
        return self.root / "models" / "versions"

    @property
    def training_runs(self) -> Path:
        """One folder per fine-tuning run, named by a hash of its inputs."""
        return self.root / "models" / "runs"

    @property
    def model_cache(self) -> Path:
        """Embeddings and crops the training reuses, cached by content."""
        return self.root / "models" / "cache"

    # -- the web service
    @property
    def query_images(self) -> Path:
        """Uploaded query images, kept so training can crop them again (``feedback.query_dir``)."""
        return self.root / self._settings.feedback.query_dir

    @property
    def thumbnails(self) -> Path:
        """The cache of face thumbnails (``web.thumbnail_dir``)."""
        return self.root / self._settings.web.thumbnail_dir

    @property
    def tokens(self) -> Path:
        """Hashed API tokens (``web.tokens_file``)."""
        return self.root / self._settings.web.tokens_file

    @property
    def sessions(self) -> Path:
        """Page login sessions, beside the tokens."""
        return self.tokens.parent / "sessions.sqlite"

    @property
    def session_key(self) -> Path:
        """The secret that signs session cookies, beside the tokens."""
        return self.tokens.parent / "session.key"

    @property
    def former_audit_log(self) -> Path:
        """Where an older release kept its JSON-lines curation log; ``face-assets migrate`` takes it into the
        catalog's audit table."""
        return self.root / "audit" / "people.jsonl"

    # -- the Dagster graph
    @property
    def incoming(self) -> Path:
        """The default watched folder."""
        return self.root / "incoming"

    @property
    def pipeline(self) -> Path:
        """Files of the graph that are not in a store: batch manifests and staged Parquet."""
        return self.root / "pipeline"

    @property
    def batches(self) -> Path:
        """One folder per batch (partition): its manifest and staged Parquet."""
        return self.pipeline / "batches"

    @property
    def feedback_export(self) -> Path:
        """The feedback export the graph trains on (``pipeline.feedback_export_dir``)."""
        return self.root / self._settings.pipeline.feedback_export_dir


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return overrides


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(err["loc"]))
            lines.append(f"unknown key '{key}'; allowed keys here: {allowed}")
        else:
            lines.append(f"invalid value for '{key}' ({err.get('input')!r}): {err['msg']}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build validated :class:`Settings` from defaults, a config file, the environment and overrides.

    Args:
        config_path: YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; when None, the file named by
            the ``FACE_ASSETS_CONFIG`` environment variable, if any.
        overrides: nested mapping applied last, e.g. ``{"filter": {"min_det_score": 0.7}}``.
        environ: environment to read overrides from (default ``os.environ``).

    Raises:
        ConfigError: unreadable file, unknown key, or invalid value (the message names the key).
    """
    environ = os.environ if environ is None else environ
    if config_path is None and environ.get(CONFIG_ENV):
        config_path = environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if config_path is not None:
        data = _read_file(Path(config_path))
        sources.append(str(config_path))
    env = _env_overrides(environ)
    if env:
        data = _merge(data, env)
        sources.append("environment")
    if overrides:
        data = _merge(data, overrides)
        sources.append("overrides")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, " + ".join(sources)) from None


def write_settings(settings: Settings, path: str | os.PathLike[str]) -> Path:
    """Write ``settings`` as a YAML config file that :func:`load_settings` reads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " / ".join(f"`{v}`" for v in get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("pathlib.", "").replace("|", "or")


def config_reference() -> str:
    """Markdown table of every setting with its default and description, generated from the models."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for section, field in Settings.model_fields.items():
        model = field.annotation
        defaults = model().model_dump(mode="json")
        for name, sub in model.model_fields.items():
            lines.append(
                f"| `{section}.{name}` | {_type_name(sub.annotation)} | `{json.dumps(defaults[name])}` | {sub.description or ''} |"
            )
    return "\n".join(lines)


def datasets_root(environ: Mapping[str, str] | None = None, base: str | os.PathLike[str] | None = None) -> Path:
    """The shared labelled reference images (tests, calibration, benchmarks, the training gate's default set).

    ``FACE_ASSETS_DATASETS`` when set, else ``../shared/datasets`` from ``base``: by default the
    working directory, like every relative path of the configuration (``storage.data_dir``), so a
    checkout run from its root finds the folder beside it, and an installed package does not look
    inside its own installation.
    """
    environ = os.environ if environ is None else environ
    if environ.get(DATASETS_ENV):
        return Path(environ[DATASETS_ENV])
    return (Path(base) if base is not None else Path.cwd()).resolve().parent / "shared" / "datasets"
