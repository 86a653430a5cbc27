"""What a drafter folder carries so that it loads and decodes from the Hub without the package.

code_files.py       writes / checks the code files (`python -m clover2_hf.hub DIR`)
remote_generate.py  the `custom_generate/generate.py` entry point those files start from
"""
