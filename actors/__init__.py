"""A supervised actor runtime on trio: actors, mailboxes, OTP-style supervisors."""
