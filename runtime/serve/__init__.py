"""The HTTP server (`python -m runtime.serve`): a web page, OpenAI's Images API and AUTOMATIC1111's API over the
runtime, one queue and worker per model. Needs the `[serve]` extra; `import runtime` never imports it."""
