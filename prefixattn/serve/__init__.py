"""Serving tuned prefixes on vLLM: one base model, every prefix its own model name, no fork of vLLM.

The top layer of the package (it uses ``prefixattn.prefix``; nothing imports it but the command's lazy
``serve`` dispatch). Only ``connector``, ``middleware`` and ``offline`` import vLLM, and only vLLM loads the
first two (by the module paths ``prefixattn serve`` hands it).

    cli.py              ``prefixattn serve MODEL_DIR --prefix NAME=ADAPTER ... [vLLM options]``
    launch.py           check, write the run directory, start vLLM's OpenAI server with the plug-ins
    model_layout.py     which models vLLM's cache can hold a prefix for (config.json, no weights)
    adapters.py         PEFT adapters, prefixattn prefix files and banks -> per-layer keys and values
    table.py            the served-prefix table (run directory: manifest + tensors), cache salts
    admission.py        HTTP decisions without vLLM: refusals, request and response rewriting
    engine_requests.py  the connector's decisions without vLLM: which requests, how many slots, where
    connector.py        the vLLM KV connector that writes a prefix into the paged cache
    middleware.py       the ASGI middleware: model names, refusals (4xx), rendering, rewriting
    offline.py          the same for ``vllm.LLM`` in a Python program
    versions.py         the vLLM versions it was tested with (others refused unless allowed)
"""
