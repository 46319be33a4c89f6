"""Data input: MedVidBench records (records.py), their task keys (task_key.py) and qwen-vl-utils'
frame sampling (sampling.py)."""

from medgrpo.data.records import (
    RecordDataset,
    RecordError,
    RegionCaptionInfo,
    VideoRecord,
    parse_record,
    resolve_path,
)
from medgrpo.data.sampling import (
    FramePlan,
    frame_list_presize,
    frame_range,
    pad_to_even,
    plan_frame_list,
    plan_frames,
    sample_indices,
    second_per_grid_ts,
    smart_nframes,
    smart_resize,
    video_max_pixels,
)
from medgrpo.data.task_key import CAPTION_QA_TYPES, QA_TYPES, TaskKey, normalize_qa_type

__all__ = [
    "CAPTION_QA_TYPES",
    "QA_TYPES",
    "FramePlan",
    "RecordDataset",
    "RecordError",
    "RegionCaptionInfo",
    "TaskKey",
    "VideoRecord",
    "frame_list_presize",
    "frame_range",
    "normalize_qa_type",
    "pad_to_even",
    "parse_record",
    "plan_frame_list",
    "plan_frames",
    "resolve_path",
    "sample_indices",
    "second_per_grid_ts",
    "smart_nframes",
    "smart_resize",
    "video_max_pixels",
]
