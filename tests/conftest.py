import os
import sys

# Tests import the project's top-level modules (optim, nanogpt_sai, ...) and tests/ helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
