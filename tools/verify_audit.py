#!/usr/bin/env python3
"""Verify an AI-BOS audit chain from the API's output alone (docs/audit-format.md).

    curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:3001/api/kernel/audit?limit=1000' > page.json
    python3 tools/verify_audit.py page.json [more pages in order...]

Standard library only. Canonical JSON follows RFC 8785; for entries whose
details contain no floating-point numbers, json.dumps with sorted keys, no
whitespace and ensure_ascii=False produces exactly the RFC 8785 form. Entries
with non-integer numbers need a full RFC 8785 library (e.g. PyPI "rfc8785").
"""
import hashlib
import json
import sys

GENESIS = "0" * 64


def canonical(entry):
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def main(paths):
    entries = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            entries.extend(json.load(f)["items"])
    prev, expected_seq = GENESIS, 1
    for e in entries:
        if e["seq"] != expected_seq:
            print(f"BROKEN at seq {expected_seq}: next entry has seq {e['seq']}")
            return 1
        if e["prev_hash"] != prev:
            print(f"BROKEN at seq {e['seq']}: prev_hash does not match the previous entry")
            return 1
        digest = hashlib.sha256(canonical(e).encode("utf-8")).hexdigest()
        if digest != e["hash"]:
            print(f"BROKEN at seq {e['seq']}: hash does not match the content")
            return 1
        prev, expected_seq = e["hash"], expected_seq + 1
    print(f"ok: {len(entries)} entries, head {prev}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
