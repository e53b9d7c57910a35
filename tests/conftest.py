"""Shared test setup: offline Hugging Face, repo root on sys.path, paths to shared sample data."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real sample data lives beside the checkout (../shared), never inside the repository.
SAMPLE = ROOT.parent / "shared" / "greenrfm-sample-data"
