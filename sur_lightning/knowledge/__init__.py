"""Knowledge: what the LLM is told or asked beyond the prompt. ``knowledge_base`` (local JSONL facts; the bundled
``toyworld.jsonl`` lives in this folder), ``rag`` (the retriever that puts facts in front of the prompt),
``name_dropout`` (renaming objects in prompt and fact, for training), ``rewriter`` (an LLM that writes prompts).

May import: ``models`` (sentence encoder, model loading) and ``config`` (the process rank). Nothing above.
"""
