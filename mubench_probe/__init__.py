"""mubench_probe: what a vision-language model really sees in microscopy images.

Extract once (`extract`), evaluate everything from the store alone.
"""

from . import api
from .api import (
    DEFAULT_STORE,
    MUBENCH_ID,
    MUBENCH_MODELS,
    EvalConfig,
    ExtractConfig,
    TaskSpec,
    compare,
    evaluate,
    export,
    extract,
    interpolate,
    launch_extract,
    list_tasks,
    open_dataset,
    open_store,
    read_task_file,
    search,
    store_info,
    store_status,
    verify_store,
)
from .errors import ProbeError

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_STORE",
    "MUBENCH_ID",
    "MUBENCH_MODELS",
    "EvalConfig",
    "ExtractConfig",
    "ProbeError",
    "TaskSpec",
    "api",
    "compare",
    "evaluate",
    "export",
    "extract",
    "interpolate",
    "launch_extract",
    "list_tasks",
    "open_dataset",
    "open_store",
    "read_task_file",
    "search",
    "store_info",
    "store_status",
    "verify_store",
]
