#!/usr/bin/env python3
"""The Python stack's folder upload, for `cargo bench -p ferrotune-azure --bench upload`.

azure-ai-ml uploads a local model folder file by file with azure-storage-blob's
`BlobClient.upload_blob(..., max_concurrency=N)` (blocks in parallel within a file). This does the
same against the given account (Azurite in the benchmark) and prints one JSON line.

    pip install azure-storage-blob
    python scripts/bench_upload_reference.py --account-url URL --account NAME --key KEY \
        --container C --dir DIR --prefix P [--concurrency 8] [--block-size 33554432] [--validate-content]
"""
import argparse
import json
import os
import time

from azure.storage.blob import BlobServiceClient


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--account-url", required=True)
    p.add_argument("--account", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--container", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32 * 1024 * 1024)
    p.add_argument("--validate-content", action="store_true", help="send an MD5 with every block, as ferrotune does")
    a = p.parse_args()
    service = BlobServiceClient(
        account_url=a.account_url,
        credential={"account_name": a.account, "account_key": a.key},
        max_block_size=a.block_size,
        max_single_put_size=a.block_size,
    )
    container = service.get_container_client(a.container)
    try:
        container.create_container()
    except Exception:  # exists already
        pass
    files = []
    for root, _, names in os.walk(a.dir):
        for n in sorted(names):
            files.append(os.path.join(root, n))
    files.sort()
    total = 0
    start = time.perf_counter()
    for path in files:
        rel = os.path.relpath(path, a.dir).replace(os.sep, "/")
        with open(path, "rb") as f:
            container.get_blob_client(f"{a.prefix}/{rel}").upload_blob(
                f, overwrite=True, max_concurrency=a.concurrency, validate_content=a.validate_content
            )
        total += os.path.getsize(path)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "bytes": total, "files": len(files)}))


if __name__ == "__main__":
    main()
