import os
import sys

# tests/toy.py (exact denoisers) is shared by several test files
sys.path.insert(0, os.path.dirname(__file__))
