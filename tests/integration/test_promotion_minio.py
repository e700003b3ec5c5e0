"""The champion pointer against the real MinIO (jobs/promotion.py): the first promotion with If-None-Match, a
second moving it with If-Match on the ETag, promotions racing with exactly one winner, a stale ETag refused. The
checks are tests/unit/test_promotion.py's, there run on a local folder.

MinIO answers a lost conditional write with 412 PreconditionFailed, racing writers included (AWS S3 answers 409
ConditionalRequestConflict to a writer whose rival is still in flight, 412 once it is done), and If-Match on a
key that is gone with 404 NoSuchKey, as AWS does; jobs/promotion.write_champion re-reads the pointer after any
refusal, so each case ends in the same answer.
"""
from __future__ import annotations

import pytest

from tests.unit.test_promotion import (check_a_stale_tag_is_refused, check_concurrent_promotions_have_one_winner,
                                       check_first_then_gated_moves)

pytestmark = pytest.mark.s3


def test_first_promotion_uses_if_none_match_and_the_next_if_match(tmp_path, s3_env, s3_prefix, s3_client, stack):
    from jobs.storage import S3Store, open_store

    store, prefix = open_store(s3_prefix)
    assert isinstance(store, S3Store)
    check_first_then_gated_moves(store, f"{prefix}/r1", tmp_path)
    head = s3_client.head_object(Bucket=stack.bucket, Key=f"{prefix}/r1/champion")
    assert store.get_versioned(f"{prefix}/r1/champion")[1] == head["ETag"]


def test_concurrent_promotions_have_exactly_one_winner(tmp_path, s3_env, s3_prefix):
    from jobs.storage import open_store

    _, prefix = open_store(s3_prefix)
    # one client each, as separate launchers or Jobs would have
    check_concurrent_promotions_have_one_winner(lambda: open_store(s3_prefix)[0], f"{prefix}/race", tmp_path,
                                                racers=6)


def test_a_stale_etag_is_refused(tmp_path, s3_env, s3_prefix):
    from jobs.storage import open_store

    store, prefix = open_store(s3_prefix)
    check_a_stale_tag_is_refused(store, f"{prefix}/stale", tmp_path)


def test_if_match_on_a_removed_pointer_is_a_conflict_not_a_traceback(tmp_path, s3_env, s3_prefix):
    from jobs.promotion import PromotionConflict, promote, read_champion, write_champion
    from jobs.storage import open_store
    from tests.unit.test_promotion import GOOD, publish

    store, prefix = open_store(s3_prefix)
    run = f"{prefix}/gone"
    promote(store, run, publish(store, run, tmp_path, "g1", rouge=GOOD))
    pointer, tag = read_champion(store, run)
    store.delete(f"{run}/champion")  # MinIO: If-Match on a missing key is 404 NoSuchKey
    with pytest.raises(PromotionConflict, match="removed the champion pointer"):
        write_champion(store, run, {**pointer, "token": "x"}, tag)
