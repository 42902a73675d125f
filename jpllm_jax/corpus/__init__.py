"""The Swallow-style Japanese web-corpus pipeline: WARC -> Japanese pages -> extracted text -> quality
rules -> NG words and hosts -> MinHash deduplication -> normalisation -> sharded JSONL documents."""
