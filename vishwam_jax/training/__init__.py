"""Training: data, optimizer, loss and the jitted train step."""
