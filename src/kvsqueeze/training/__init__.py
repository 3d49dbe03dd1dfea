"""Training of learned selectors (AttentionPredictor): attention traces and the training loop, apart from the
selectors themselves (`kvsqueeze.selection`)."""
