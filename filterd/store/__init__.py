"""What filterd keeps on disk: durable writes, Maildir delivery and the quarantine store."""
