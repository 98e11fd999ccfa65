"""Router math shared by the reference forward and the vLLM layers."""
