"""Datasets: the embedded shapes-VQA generator, the folder loader users bring their data through, the tokenizer.

Import the submodules you need (`distill.data.folder`, `distill.data.generate`, `distill.data.tokenizer`);
this package imports nothing so that `import distill.data` stays cheap.
"""
