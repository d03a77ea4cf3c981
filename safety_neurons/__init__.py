"""safety-neurons: find, switch off and strengthen the safety-specific neurons of chat LLMs."""

__version__ = "0.1.0"
