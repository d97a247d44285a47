"""The client side: requests, continuous batching, the replica router."""
