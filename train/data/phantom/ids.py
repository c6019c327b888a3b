"""Identifiers and splits of a phantom set: MIMIC-CXR-style ids and an ~80/10/10 split by subject."""

from __future__ import annotations

import hashlib


def _hash_int(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def subject_key(index: int) -> int:
    """Two consecutive studies share a patient."""
    return index // 2


def make_ids(seed: int, index: int) -> tuple[int, int, str]:
    """(subject_id, study_id, dicom_id), unique within a set of up to 10 million images."""
    key = subject_key(index)
    # affine permutations of [0, 10^7): multipliers coprime with 10^7 make the ids unique.
    a_subj = 1 + 2 * (_hash_int("a_subj", seed) % 4_999_999)
    a_subj += 2 if a_subj % 5 == 0 else 0
    a_stud = 1 + 2 * (_hash_int("a_stud", seed) % 4_999_999)
    a_stud += 2 if a_stud % 5 == 0 else 0
    subject_id = 10_000_000 + (a_subj * key + _hash_int("b_subj", seed)) % 10_000_000
    study_id = 50_000_000 + (a_stud * index + _hash_int("b_stud", seed)) % 10_000_000
    digest = hashlib.sha1(f"phantom-dicom:{seed}:{index}".encode()).hexdigest()
    dicom_id = "-".join(digest[i:i + 8] for i in range(0, 40, 8))
    return subject_id, study_id, dicom_id


def split_of(seed: int, index: int) -> str:
    """~80/10/10 by subject (MIMIC-CXR names: train / validate / test)."""
    u = _hash_int("split", seed, subject_key(index)) % 1000
    return "train" if u < 800 else ("validate" if u < 900 else "test")


def avoided(seed: int, index: int) -> bool:
    """Whether the image is among the ~1 % that images_to_avoid.csv lists (test images only, as in Chest
    ImaGenome, whose list holds its gold-standard images)."""
    return _hash_int("avoid", seed, index) % 100 == 0
