"""Protocol definitions (``*.proto``) and their generated, checked-in stubs.

Regenerate with ``python scripts/gen_protos.py``; ``tests/unit/test_protos_fresh.py`` fails when
the checked-in stubs differ from what the pinned grpcio-tools would generate.
"""
