"""Reading and writing scans: NIfTI volumes with JSON sidecars (``nifti``)."""

from .nifti import (  # noqa: F401
    NiftiError, nifti_path_ok, load_image, voxel_sizes, b0_from_affine, sizes_to_canonical,
    direction_to_canonical, read_sidecar, b0_direction_in_file, to_ppm, from_ppm, read_volume,
    read_aligned, load_scan, load_orientation, sidecar_path, check_output_path, write_json,
    save_volume, save_result, GAMMA_BAR_MHZ_PER_T, UNITS,
)
from .nifti import SidecarError, read_json_object  # noqa: F401  (one JSON-sidecar policy)

__all__ = ["NiftiError", "nifti_path_ok", "load_image", "voxel_sizes", "b0_from_affine", "sizes_to_canonical", "direction_to_canonical", "read_sidecar", "b0_direction_in_file", "to_ppm", "from_ppm", "read_volume", "read_aligned", "load_scan", "load_orientation", "sidecar_path", "check_output_path", "write_json", "save_volume", "save_result", "GAMMA_BAR_MHZ_PER_T", "UNITS",
           "SidecarError", "read_json_object"]
