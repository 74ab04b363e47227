"""`python -m crdtchat.providers.llama_server [llama_cpp.server options]`.

llama-cpp-python's OpenAI-compatible server, with the model loaded as the local provider
loads it: in plain CPU buffers (`crdtchat.providers.local.plain_cpu_buffers` says why; on a
machine that reports AMX without enabling it, the stock server dies on its first request).
"""

from __future__ import annotations

import runpy


def main() -> None:
    import llama_cpp

    from crdtchat.providers.local import plain_cpu_buffers

    with plain_cpu_buffers(llama_cpp):  # for the server's lifetime: it loads models lazily
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
