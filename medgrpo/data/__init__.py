"""Data input: MedVidBench records (records.py) and qwen-vl-utils' frame sampling (sampling.py)."""

from medgrpo.data.records import (
    CAPTION_QA_TYPES,
    QA_TYPES,
    RecordDataset,
    RecordError,
    RegionCaptionInfo,
    VideoRecord,
    normalize_qa_type,
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

__all__ = [
    "CAPTION_QA_TYPES",
    "QA_TYPES",
    "FramePlan",
    "RecordDataset",
    "RecordError",
    "RegionCaptionInfo",
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
