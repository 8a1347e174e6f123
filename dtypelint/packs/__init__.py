"""The pack engine: what a backend's kernels accept, as data.

A pack is one TOML file (the shipped ones are package data in ``shipped/``, the top-level ``rules/`` of the
repository; the schema is ``shipped/README.md``). ``schema`` reads and validates packs into
``BackendPack`` and ``Contract`` records, ``operands`` resolves a contract's selectors to the tensors of a
traced model, ``sdpa_dispatch`` models which kernel CUDA's SDPA gives a call. Each contract is judged by
the rule ``dtypelint.rules.kernel_contract.ContractRule``.
"""
