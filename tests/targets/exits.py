"""A script target that fails the way a CLI does: a non-zero exit status."""
import sys

print("about to fail")
sys.exit(3)
