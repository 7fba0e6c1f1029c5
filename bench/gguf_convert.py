"""Time of llama.cpp's GGUF conversion of a merged folder and the files' sizes, as merge_and_push.py --gguf makes them
(gguf_export.convert: the converter for f16 and q8_0, llama.cpp's quantizer for q4_k_m from the f16 file).

    python bench/gguf_convert.py --merged_dir llama-2-7b-yubong-merged --types f16,q8_0,q4_k_m

Prints one JSON line per file and a last one with the machine; the files go to --out_dir (default: a fresh
<merged_dir>-gguf-bench, removed at the end unless --keep).
"""

import argparse
import json
import os
import platform
import shutil
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf_export  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged_dir", required=True)
    parser.add_argument("--types", default="f16,q8_0,q4_k_m")
    parser.add_argument("--out_dir", default="")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    out_dir = args.out_dir or f"{args.merged_dir.rstrip('/')}-gguf-bench"
    shutil.rmtree(out_dir, ignore_errors=True)
    types = list(dict.fromkeys([gguf_export.REFERENCE_TYPE, *gguf_export.requested_types(args.types)]))
    gguf_export.check_llama_cpp()
    gguf_export.converter_script()  # fetched before the clock starts
    settings = SimpleNamespace(merged_dir=args.merged_dir, gguf_dir=out_dir, hub_repo="bench", overwrite_merged=True)
    record = gguf_export.convert(settings, types, {"bench": args.merged_dir})
    for gguf_type, made in record["files"].items():
        seconds = round(made["convert_seconds"], 2)
        print(json.dumps({"type": gguf_type, "bytes": made["bytes"], "convert_seconds": seconds}))
    print(json.dumps({"merged_dir": args.merged_dir, "cpu": platform.processor() or platform.machine(),
                      "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}))  # fmt: skip
    if not args.keep:
        shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()
