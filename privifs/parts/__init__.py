"""Big files stored as parts: the manifest format (:mod:`.format`) and the client-level layer
that stores, reads and collects parts (:mod:`.store`)."""
