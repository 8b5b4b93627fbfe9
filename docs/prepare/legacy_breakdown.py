"""Stage breakdown of the one-process prepare as of commit f47c1a8 (before the parallel build).

Times, per LiTS-size case, the stages the builder ran: read and decompress, canonicalise,
resample, components, histograms, context stacks + TFDS encode, serialize, and TFDS's writer
(in-memory/spill buffer, sort, ArrayRecord write). CPU-ms from time.process_time (all threads).
"""
import json, os, sys, time, tempfile, shutil
import numpy as np
sys.path.insert(0, os.getcwd())
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from data_pipelines import lits, slices, lits_tfds, intensity
from nibabel import orientations

class T:
  def __init__(self): self.cpu = {}; self.wall = {}
  def __call__(self, name):
    t = self
    class C:
      def __enter__(s): s.c, s.w = time.process_time(), time.perf_counter()
      def __exit__(s, *a):
        t.cpu[name] = t.cpu.get(name, 0) + time.process_time() - s.c
        t.wall[name] = t.wall.get(name, 0) + time.perf_counter() - s.w
    return C()

def main(lits_dir, image_size, out):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import example_serializer, writer as writer_lib, naming, shuffle, file_adapters
  shuffle.MAX_MEM_BUFFER_SIZE = lits_tfds._WRITER_BUFFER_BYTES
  cases = lits.find_cases(lits_dir)
  tmp = tempfile.mkdtemp()
  cfg = lits_tfds.LitsConfig(context_slices=3, image_size=image_size, val_fraction=0.2,
                             test_fraction=0.0, split_seed=0, fingerprint="x")
  b = lits_tfds.Lits(data_dir=tmp, config=cfg, file_format="array_record")
  features = b.info.features
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  template = naming.ShardedFileTemplate(data_dir=tmp, dataset_name="lits", split="train",
                                        filetype_suffix="array_record")
  writer = writer_lib.Writer(serializer=serializer, filename_template=template, hash_salt="train",
                             disable_shuffling=True,
                             example_writer=writer_lib.ExampleWriter(file_adapters.FileFormat.ARRAY_RECORD))
  t = T(); nslices = 0
  numbers = sorted(cases)
  with lits_tfds._array_record_options("uncompressed"):
    for i, n in enumerate(numbers):
      vpath, spath = cases[n]
      temps = []
      with t("read+decompress"):
        vol = lits._open_nifti(vpath, "CT volume", temps); shape = lits._shape3(vol, vpath, "v")
        unit = lits._spacing_mm(vol, vpath); slope, inter = lits._scaling(vol, vpath, "v")
        raw = np.array(lits._read_raw(vol, shape, vpath, "v"))
        seg = lits._open_nifti(spath, "segmentation", temps)
        sslope, sinter = lits._scaling(seg, spath, "s")
        sraw = np.array(lits._read_raw(seg, shape, spath, "s"))
      with t("canonicalise"):
        hu = lits._to_hu(raw, slope, inter, vpath)
        labels = lits._to_labels(sraw, sslope, sinter, spath)
        affine = vol.affine.copy(); affine[:3, :] *= unit
        ornt = orientations.io_orientation(affine)
        image = np.ascontiguousarray(orientations.apply_orientation(hu, ornt))
        labels = np.ascontiguousarray(orientations.apply_orientation(labels, ornt))
        can = affine @ orientations.inv_ornt_aff(ornt, shape)
        spacing = tuple(float(s) for s in np.linalg.norm(can[:3, :3], axis=0))
      del raw, sraw, hu
      size = slices.stored_shape(image.shape, spacing, image_size, None)
      with t("components"):
        comps = slices.tumour_components(labels, spacing, size)
      with t("resample"):
        image_r = slices.resample_image(image, size)
        labels_r = slices.resample_labels(labels, size)
      with t("components"):
        for k, parts in enumerate(comps):
          for part in parts:
            r0, c0 = np.floor(part["bbox"][:2]).astype(int)
            r1, c1 = np.ceil(part["bbox"][2:]).astype(int)
            part["stored_pixels"] = np.int32(np.count_nonzero(labels_r[r0:r1, c0:c1, k] == 2))
        liver_range = np.array(slices.liver_z_range(labels), np.int32)
      with t("histograms"):
        slices.intensity_histograms(image, labels)
      z = image.shape[2]; nslices += z
      neighbours = slices.context_indices(z, 3)
      stored_spacing = np.array([spacing[0] * image.shape[0] / size[0],
                                 spacing[1] * image.shape[1] / size[1], spacing[2]], np.float32)
      for k in range(z):
        with t("context stack"):
          ex = dict(image=np.ascontiguousarray(image_r[:, :, neighbours[k]]),
                    label=np.ascontiguousarray(labels_r[:, :, k]), case_number=np.int32(n),
                    slice_index=np.int32(k), num_slices=np.int32(z), spacing=stored_spacing,
                    liver_z_range=liver_range, tumours=comps[k])
        with t("encode (TFDS features)"):
          enc = features.encode_example(ex)
        with t("serialize"):
          ser = serializer.serialize_example(enc)
        with t("TFDS buffer/spill"):
          writer._shuffler.add(lits_tfds.example_key(i, k, len(numbers)), ser)
      print(f"case {n}: {z} slices", flush=True)
    with t("TFDS sort + ArrayRecord write"):
      writer.finalize()
  shutil.rmtree(tmp)
  total = sum(t.cpu.values())
  rows = {k: dict(cpu_ms_per_slice=1000 * v / nslices, wall_ms_per_slice=1000 * t.wall[k] / nslices)
          for k, v in t.cpu.items()}
  for k, r in rows.items():
    print(f"  {k:32s} {r['cpu_ms_per_slice']:7.2f} CPU-ms  {r['wall_ms_per_slice']:7.2f} wall-ms per slice")
  print(f"  {'total':32s} {1000*total/nslices:7.2f} CPU-ms  {1000*sum(t.wall.values())/nslices:7.2f} wall-ms per slice")
  json.dump(dict(stages=rows, slices=nslices, cases=len(numbers), cpu_ms_per_slice=1000*total/nslices,
                 wall_ms_per_slice=1000*sum(t.wall.values())/nslices, load_average=os.getloadavg()),
            open(out, "w"), indent=1)

if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
