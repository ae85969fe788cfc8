"""Where and how artifacts are stored: atomic files (tables, arrays, JSON, figures), the
features folder, model weights, images and the proposal cache. The only package that knows
file formats; stages read and write through it."""

from grounding.io.files import (
    FIGURE_FORMATS,
    atomic,
    check_writable_file,
    check_writable_folder,
    read_array,
    read_csv,
    read_features,
    read_json,
    read_table,
    read_tables,
    region_features_writer,
    write_array,
    write_bytes,
    write_csv,
    write_features,
    write_figure,
    write_files,
    write_json,
    write_png,
    write_table,
    write_tables,
    write_text,
)
from grounding.io.images import ImageFolder, decode_image, present_files, read_image
from grounding.io.proposal_cache import ProposalCache
from grounding.io.weights import read_weights, write_weights

__all__ = [
    "FIGURE_FORMATS",
    "ImageFolder",
    "ProposalCache",
    "atomic",
    "check_writable_file",
    "check_writable_folder",
    "decode_image",
    "present_files",
    "read_array",
    "read_csv",
    "read_features",
    "read_image",
    "read_json",
    "read_table",
    "read_tables",
    "read_weights",
    "region_features_writer",
    "write_array",
    "write_bytes",
    "write_csv",
    "write_features",
    "write_figure",
    "write_files",
    "write_json",
    "write_png",
    "write_table",
    "write_tables",
    "write_text",
    "write_weights",
]
