"""Render exported DICOM series as a PACS would, with DCMTK's dcm2pnm (modality LUT + the file's window).

    apt-get install dcmtk
    napari-qsm dicom chi.nii.gz -o chi_dcm; napari-qsm swi RAW -o swi --dicom
    python docs/make_dicom_screenshots.py chi_dcm swi/swi_dicom swi/minip_dicom -o docs/dicom_dcm2pnm.png
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pydicom  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("series", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    fig, axs = plt.subplots(1, len(a.series), figsize=(5 * len(a.series), 5.6))
    for ax, folder in zip(axs if len(a.series) > 1 else [axs], a.series):
        files = sorted(Path(folder).glob("*.dcm"))
        f = files[len(files) // 2]
        ds = pydicom.dcmread(f)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "x.png"
            subprocess.run(["dcm2pnm", "--write-png", "+Wi", "1", str(f), str(png)], check=True,
                           capture_output=True)
            ax.imshow(plt.imread(png), cmap="gray", interpolation="nearest")
        ax.set_title(f"{ds.SeriesDescription[:40]}\n{f.name}: window C {float(ds.WindowCenter):g} / "
                     f"W {float(ds.WindowWidth):g} {ds.RescaleType}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Exported series rendered by DCMTK dcm2pnm with the file's own window (as a PACS opens them)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(a.output, dpi=90)


if __name__ == "__main__":
    main()
