"""Images -> training batches: decoding, class images (prior preservation), global batches."""
