"""The SentencePiece tokenizer a memorizing GPT was trained with, for AutoTokenizer.

Training tokenizes each document without a begin-of-sequence piece and appends the end-of-sentence
id after it; encoding here adds no special tokens either, so ids match the training data.
This file is copied next to the weights of every export: it imports only sentencepiece and transformers.
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MemorizingGPTTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
        # The model's own special pieces, unless the saved tokenizer_config says otherwise.
        for name, piece_id in (
            ("unk_token", self.sp_model.unk_id()),
            ("bos_token", self.sp_model.bos_id()),
            ("eos_token", self.sp_model.eos_id()),
            ("pad_token", self.sp_model.pad_id()),
        ):
            if piece_id >= 0:
                kwargs.setdefault(name, self.sp_model.id_to_piece(piece_id))
        # Decoding returns the text exactly, as sentencepiece does.
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # No special tokens around a document (transformers 5.0 defaulted to [CLS] ... [SEP]).
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str) -> list:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list) -> str:
        return self.sp_model.decode_pieces(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
